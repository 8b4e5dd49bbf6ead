"""Typed plan configs: schema, YAML presets with inheritance, profiles."""

from lever.config.loader import PlanError, config_hash, list_plans, load_plan, plan_to_yaml, resolve_plan
from lever.config.schema import PlanConfig

__all__ = ["PlanConfig", "PlanError", "config_hash", "list_plans", "load_plan", "plan_to_yaml", "resolve_plan"]
