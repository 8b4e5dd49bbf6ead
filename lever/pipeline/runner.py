"""Stage execution shared by every executor, and the local runner built on it.

``run_unit`` is the one code path that turns (plan, stage, unit) into a committed artifact: it
computes the unit's content key, returns at once when a verified artifact is already there,
otherwise takes the unit's lease (``lease.py``; waiting while another run builds it, then using
that run's result), materializes the upstream artifacts, builds the ``StageContext`` (its ``out``
is the persistent staging directory, so a killed stage resumes), calls the stage function from
the graph and commits -- all while holding the lease.  ``lever stage`` (the Argo container) calls
it for one unit; ``lever run`` walks the whole graph with it, fanning units out to worker
processes.

The graph is an argument (default: ``graph.STAGES``) so tests can inject fake stages.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from lever.config.schema import PlanConfig
from lever.context import StageContext, Unit, UpstreamOutput, _NullTelemetry
from lever.errors import StageError
from lever.pipeline.graph import STAGES, Stage
from lever.pipeline.hashing import PlanKeys, artifact_key, full_config_hash, plan_keys
from lever.storage.backends import open_store
from lever.storage.lease import (
    HeldLease,
    LeaseLost,
    LeaseSettings,
    UnitBusy,
    Waiting,
    acquire_unit,
    owner_info,
)
from lever.storage.store import CorruptArtifact, Staging, StagingBusy, Store

log = logging.getLogger("lever.runner")

#: config sections a ``--set`` override also applies to in the baseline plan: the ones that make
#: the two runs comparable (data, models, beams/RL data and the v2 model both start from, eval),
#: never the RCE/GRPO recipe being compared (selector, reward, rce, grpo, validation, checkpoint)
SHARED_OVERRIDE_SECTIONS = ("data", "encoder", "sampler", "lvlm", "models", "beam", "rl_data", "v2", "infer",
                            "report", "alerts", "platform", "seed")


@dataclass
class UnitResult:
    stage: str
    unit: str
    key: str
    status: str  # cached | built | rebuilt | failed (| busy: internal, see run_stage)
    seconds: float = 0.0
    location: str = ""
    error: str = ""
    plan: str = ""
    #: seconds spent waiting for another run that held the unit's lease (0: none)
    waited: float = 0.0


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def make_telemetry(plan_name: str, run_id: str, stage: str, unit: Optional[str] = None, alerts: Any = None) -> Any:
    """Prometheus telemetry (``lever.obs.telemetry``) when configured, else the no-op object."""
    try:
        from lever.obs.telemetry import make_telemetry as _make  # type: ignore[attr-defined]
    except ImportError:
        return _NullTelemetry()
    try:
        try:
            return _make(plan_name, run_id, stage, unit=unit, alerts=alerts)
        except TypeError:
            return _make(plan_name, run_id, stage)
    except Exception as exc:  # metrics must never break a stage
        log.warning("telemetry disabled: %s", exc)
        return _NullTelemetry()


def baseline_overrides(overrides: Iterable[str]) -> list[str]:
    """The subset of ``--set`` overrides that also applies to the baseline plan."""
    out = []
    for spec in overrides:
        section = spec.split("=", 1)[0].strip().split(".")[0]
        if section in SHARED_OVERRIDE_SECTIONS:
            out.append(spec)
    return out


def load_baseline(plan: PlanConfig, profile: Optional[str], overrides: Iterable[str] = ()) -> Optional[PlanConfig]:
    """The plan the report compares against, resolved with the same profile (None if none)."""
    from lever.config.loader import load_plan

    name = plan.baseline_plan
    if not name or name == plan.name:
        return None
    return load_plan(name, profile, baseline_overrides(overrides))


class Pipeline:
    """One plan (plus its baseline) bound to a store: keys, unit selection and execution."""

    def __init__(
        self,
        plan: PlanConfig,
        store: Store,
        *,
        stages: Sequence[Stage] = STAGES,
        baseline: Optional[PlanConfig] = None,
        run_id: Optional[str] = None,
    ):
        self.plan = plan
        self.store = store
        self.stages = tuple(stages)
        self.by_name = {s.name: s for s in self.stages}
        self.baseline = baseline
        self.baseline_keys: Optional[PlanKeys] = plan_keys(baseline, self.stages) if baseline is not None else None
        self.keys = plan_keys(plan, self.stages, self.baseline_keys)
        self.run_id = run_id or new_run_id()
        self.pool: Optional[WorkerPool] = None  # shared worker processes (set by run_plan)
        self._lease_settings: Optional[LeaseSettings] = None

    @property
    def lease_settings(self) -> LeaseSettings:
        if self._lease_settings is None:
            self._lease_settings = LeaseSettings.from_env()
        return self._lease_settings

    # -- selection ------------------------------------------------------------------------
    def stage(self, name: str) -> Stage:
        try:
            return self.by_name[name]
        except KeyError:
            raise StageError(f"unknown stage {name!r}; stages: {', '.join(self.by_name)}") from None

    def select_units(self, stage: str, unit_id: Optional[str] = None, filters: Optional[dict[str, str]] = None) -> list[Unit]:
        """Units of ``stage`` matching an exact id and/or ``key=value`` filters (values compared
        as strings, so ``--unit shot=2`` matches the int 2)."""
        units = [u for u, _ in self.keys.units[self.stage(stage).name]]
        if unit_id is not None:
            units = [u for u in units if u.id == unit_id]
            if not units:
                known = ", ".join(u.id for u, _ in self.keys.units[stage])
                raise StageError(f"stage {stage!r} of plan {self.plan.name!r} has no unit {unit_id!r}; units: {known}")
        for k, v in (filters or {}).items():
            if not any(k in dict(u.params) for u in units):
                raise StageError(f"--unit {k}={v}: stage {stage!r} units have no parameter {k!r}")
            units = [u for u in units if str(u.get(k)) == str(v)]
        if not units:
            raise StageError(f"no unit of stage {stage!r} matches {filters}")
        return units

    def key(self, stage: str, unit: Unit) -> str:
        return self.keys.key_of(stage, unit)

    def status(self, stage: str, unit: Unit) -> str:
        """cached | missing | corrupt (no side effects)."""
        problems = self.store.check(self.key(stage, unit))
        return "missing" if problems is None else ("cached" if not problems else "corrupt")

    # -- inputs ---------------------------------------------------------------------------
    def _materialize(self, keys: PlanKeys, names: Iterable[str], allow_missing: bool, label: str,
                     missing: list[str]) -> dict[str, UpstreamOutput]:
        out: dict[str, UpstreamOutput] = {}
        for name in names:
            units: list[tuple[Unit, Any]] = []
            for u, h in keys.units[name]:
                key = artifact_key(name, h)
                try:
                    units.append((u, self.store.open(key)))
                except KeyError:
                    if not allow_missing:
                        raise StageError(
                            f"{label}input {name}/{u.id} of plan {keys.plan!r} is not in the store "
                            f"({self.store.location(key)}); run `lever stage {name} --plan {keys.plan}` "
                            f"or `lever run {keys.plan}` first") from None
                    missing.append(f"{label}{name}/{u.id}")
                except CorruptArtifact as exc:
                    where = self.store.quarantine(key, str(exc))
                    log.error("%s; moved to %s", exc, where)
                    if not allow_missing:
                        raise StageError(f"{label}input {exc}; it was quarantined to {where}: rebuild it "
                                         f"(`lever run {keys.plan}` does)") from None
                    missing.append(f"{label}{name}/{u.id}")
            if units or not allow_missing:
                out[name] = UpstreamOutput(name, units, keys.stage_hash[name])
        return out

    # -- execution ------------------------------------------------------------------------
    def run_unit(self, stage_name: str, unit: Unit, *, force: bool = False, fresh: bool = False,
                 wait: bool = True) -> UnitResult:
        """Build one unit unless a verified artifact already exists, holding the unit's lease.

        Another run building the same unit: wait for it and use its result (``cached``, with
        ``waited`` set), or take over when its lease expires.  ``wait=False`` returns status
        ``busy`` instead of waiting (run_stage does other units first)."""
        st = self.stage(stage_name)
        key = self.key(stage_name, unit)
        if not force and self.store.check(key) == []:
            return UnitResult(stage_name, unit.id, key, "cached", location=self.store.location(key), plan=self.plan.name)
        waiting = Waiting(key)
        owner = {**owner_info(self.plan.name, self.run_id), "unit": f"{stage_name} {unit.id}"}
        seen: dict[str, Any] = {}

        def done() -> bool:  # also keeps what it saw: the holder's first step needs it
            seen["problems"] = problems = self.store.check(key)
            return not force and problems == []

        while True:
            try:
                lease = acquire_unit(self.store.leases(), key, owner, self.lease_settings, done=done, wait=wait,
                                     say=lambda msg: log.info("%s/%s: %s", stage_name, unit.id, msg), waiting=waiting)
            except UnitBusy:
                return UnitResult(stage_name, unit.id, key, "busy", plan=self.plan.name)
            if lease is None:
                waited = waiting.seconds if waiting.holder is not None else 0.0
                if waited:
                    log.info("%s/%s: committed by another run; using it (waited %.1fs)", stage_name, unit.id, waited)
                return UnitResult(stage_name, unit.id, key, "cached", location=self.store.location(key),
                                  plan=self.plan.name, waited=round(waited, 3))
            try:
                return self._build(st, unit, key, lease, seen["problems"], force=force, fresh=fresh)
            except LeaseLost as exc:
                # the new holder builds it (a forced rebuild included): wait for its result
                log.warning("%s/%s: %s; waiting for the new holder's result", stage_name, unit.id, exc)
                force = fresh = False
            finally:
                lease.close()

    def _build(self, st: Stage, unit: Unit, key: str, lease: HeldLease, problems: Optional[list[str]], *,
               force: bool, fresh: bool) -> UnitResult:
        """The lease holder's part of run_unit: quarantine a corrupt or forced artifact (``problems``:
        the cache check made right after acquiring), read inputs, run, commit."""
        stage_name = st.name
        status = "built"
        # acquire_unit hands out the lease only when the unit is not (validly) committed or the
        # build is forced, so an artifact here is either forcibly replaced or failed verification
        if problems is not None and force:
            self.store.quarantine(key, "forced rebuild")
            status = "rebuilt"
        elif problems is not None:
            where = self.store.quarantine(key, "; ".join(problems))
            log.error("artifact %s (%s/%s) failed verification: %s; moved to %s, rebuilding",
                      key, stage_name, unit.id, "; ".join(problems), where)
            status = "rebuilt"
        missing: list[str] = []
        inputs = self._materialize(self.keys, st.inputs_for(unit, self.plan), False, "", missing)
        baseline_inputs: dict[str, UpstreamOutput] = {}
        if st.with_baseline and self.baseline_keys is not None:
            baseline_inputs = self._materialize(self.baseline_keys, st.inputs, False, "baseline ", missing)
        if fresh:
            self.store.discard_staging(key)
        return self._execute(st, unit, key, inputs, baseline_inputs, status, partial=False, missing=[], lease=lease)

    def run_partial(self, stage_name: str, *, unit: Optional[Unit] = None) -> UnitResult:
        """Run a stage on whatever inputs exist (the summarizer after a failure).  The result goes
        to ``partial/{plan}/{run_id}``, outside the content-addressed space, so it is never taken
        for the finished artifact.  With every input present this is the normal cached path."""
        st = self.stage(stage_name)
        unit = unit or self.select_units(stage_name)[0]
        missing: list[str] = []
        inputs = self._materialize(self.keys, st.inputs_for(unit, self.plan), True, "", missing)
        baseline_inputs: dict[str, UpstreamOutput] = {}
        if st.with_baseline and self.baseline_keys is not None:
            baseline_inputs = self._materialize(self.baseline_keys, st.inputs, True, "baseline:", missing)
        if not missing:
            return self.run_unit(stage_name, unit)
        key = f"partial/{self.plan.name}/{self.run_id}"
        self.store.discard_staging(key)
        if self.store.check(key) is not None:  # same run id again (exit handler retried): newest wins
            self.store.quarantine(key, "superseded by a newer partial report")
        return self._execute(st, unit, key, inputs, baseline_inputs, "partial", partial=True, missing=missing)

    @contextmanager
    def _staging(self, key: str, lease: Optional[HeldLease]) -> Iterator[Staging]:
        """The unit's staging directory, entered.  Holding the lease, a busy staging lock means a
        process on this machine that lost the lease is still running the stage: wait for it
        (it cannot commit) rather than fail."""
        announced = False
        while True:
            try:
                staging = self.store.staging(key).__enter__()
            except StagingBusy:
                if lease is None:
                    raise
                lease.ensure("entering staging")
                if not announced:
                    log.info("%s: the staging directory is still in use by a previous holder here; waiting", key)
                    announced = True
                time.sleep(self.lease_settings.poll_s)
                continue
            try:
                yield staging
            finally:
                staging.__exit__(None, None, None)
            return

    def _execute(self, st: Stage, unit: Unit, key: str, inputs: dict, baseline_inputs: dict, status: str,
                 *, partial: bool, missing: list[str], lease: Optional[HeldLease] = None) -> UnitResult:
        fn: Callable[[StageContext], None] = st.load()
        telemetry = make_telemetry(self.plan.name, self.run_id, st.name,
                                   unit=None if unit.id == "all" else unit.id, alerts=self.plan.alerts)
        t0 = time.monotonic()
        guard = lease.ensure if lease is not None else None
        try:
            with self._staging(key, lease) as staging:
                ctx = StageContext(
                    plan=self.plan, stage=st.name, unit=unit, inputs=inputs, out=staging.path, run_id=self.run_id,
                    baseline_inputs=baseline_inputs, telemetry=telemetry,
                    log=logging.getLogger(f"lever.stage.{st.name}"),
                    config_hash=key.rsplit("/", 1)[-1], baseline_plan=self.baseline, partial=partial,
                    missing=list(missing), store=self.store,
                )
                with _StagingSync(self.store, key, lease):
                    fn(ctx)
                meta = {
                    "stage": st.name, "unit": unit.id, "unit_params": {k: v for k, v in unit.params},
                    "plan": self.plan.name, "run_id": self.run_id, "config_hash": full_config_hash(self.plan),
                    "unit_hash": key.rsplit("/", 1)[-1], "seconds": round(time.monotonic() - t0, 3),
                    "inputs": {n: [self.key(n, u) for u, _ in o.units] for n, o in inputs.items()},
                    "partial": partial, "missing": missing,
                }
                self.store.commit(key, meta, guard=guard)
        except StagingBusy as exc:
            raise StageError(str(exc)) from None
        except BaseException:
            _safe(telemetry.stage_done, "failed", time.monotonic() - t0)
            _safe(getattr(telemetry, "push", None))
            raise
        secs = time.monotonic() - t0
        _safe(telemetry.stage_done, "built", secs)
        _safe(getattr(telemetry, "push", None))
        return UnitResult(st.name, unit.id, key, status, secs, self.store.location(key), plan=self.plan.name)

    def run_stage(self, stage_name: str, units: Optional[Sequence[Unit]] = None, *, jobs: int = 1,
                  force: bool = False, fresh: bool = False,
                  on_result: Optional[Callable[[UnitResult], None]] = None) -> list[UnitResult]:
        """Run the given (default: all) units of a stage; pending ones in ``jobs`` worker processes.
        Every unit is attempted; failures are raised together at the end so one bad shard does not
        throw away its siblings' work.  A unit another run is building is put back behind the
        free ones (two runs of one stage split its units instead of queueing on the same one)."""
        units = list(units) if units is not None else self.select_units(stage_name)
        results: list[UnitResult] = []
        pending: list[Unit] = []
        for u in units:
            if not force and self.status(stage_name, u) == "cached":
                r = UnitResult(stage_name, u.id, self.key(stage_name, u), "cached",
                               location=self.store.location(self.key(stage_name, u)), plan=self.plan.name)
                results.append(r)
                if on_result:
                    on_result(r)
            else:
                pending.append(u)
        errors: list[tuple[Unit, BaseException]] = []
        if len(pending) <= 1 or jobs <= 1:
            busy: list[Unit] = []
            done: list[UnitResult] = []
            for wait, todo in ((len(pending) <= 1, pending), (True, busy)):
                for u in todo:
                    try:
                        r = self.run_unit(stage_name, u, force=force, fresh=fresh, wait=wait)
                    except StageError:
                        raise
                    except Exception as exc:
                        r = self._failed(stage_name, u, exc, errors)
                    if r.status == "busy":
                        busy.append(u)
                        continue
                    done.append(r)
                    if on_result:
                        on_result(r)
            order = {u.id: i for i, u in enumerate(pending)}
            results.extend(sorted(done, key=lambda r: order.get(r.unit, 0)))
        else:
            results.extend(self._run_parallel(stage_name, pending, jobs, force, fresh, errors, on_result))
        if errors:
            first = errors[0][1]
            if isinstance(first, StageError):
                raise StageError(f"{len(errors)} unit(s) of {stage_name} failed; first ({errors[0][0].id}): {first}")
            raise RuntimeError(f"{len(errors)} unit(s) of {stage_name} failed; first ({errors[0][0].id}): {first!r}") from first
        return results

    def _failed(self, stage_name: str, u: Unit, exc: BaseException, errors: list) -> UnitResult:
        """Record a unit's failure; the stage raises for all of them after its other units ran."""
        errors.append((u, exc))
        return UnitResult(stage_name, u.id, self.key(stage_name, u), "failed", error=repr(exc), plan=self.plan.name)

    def _run_parallel(self, stage_name: str, pending: list[Unit], jobs: int, force: bool, fresh: bool,
                      errors: list, on_result: Optional[Callable[[UnitResult], None]]) -> list[UnitResult]:
        payload = {
            "plan": self.plan.model_dump(mode="json"),
            "baseline": self.baseline.model_dump(mode="json") if self.baseline is not None else None,
            "stages": self.stages, "store": self.store.spec(), "run_id": self.run_id,
            "log_level": logging.getLogger("lever").getEffectiveLevel(),
        }
        results = []
        own = self.pool is None
        pool = self.pool or WorkerPool(min(jobs, len(pending)))
        try:
            ex = pool.get()
            futs = {ex.submit(_worker_run, payload, stage_name, u.params, force, fresh, False): u for u in pending}
            while futs:
                fut = next(as_completed(futs))
                u = futs.pop(fut)
                try:
                    r = fut.result()
                except Exception as exc:
                    r = self._failed(stage_name, u, exc, errors)
                if r.status == "busy":  # another run builds it: wait for it behind the free units
                    futs[ex.submit(_worker_run, payload, stage_name, u.params, force, fresh, True)] = u
                    continue
                results.append(r)
                if on_result:
                    on_result(r)
        finally:
            if own:
                pool.close()
        order = {u.id: i for i, u in enumerate(pending)}
        return sorted(results, key=lambda r: order.get(r.unit, 0))


class WorkerPool:
    """A lazily started spawn-context process pool shared by all fanned-out stages of a run:
    workers start once (importing torch and building the LVLM is the expensive part) instead of
    once per stage.  Spawn, not fork: forking a process that already holds torch threads is unsafe."""

    def __init__(self, jobs: int, gpus: int = 0):
        self.jobs = max(1, jobs)
        self.gpus = gpus
        self._ex: Optional[ProcessPoolExecutor] = None

    def get(self) -> ProcessPoolExecutor:
        if self._ex is None:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            counter = ctx.Value("i", 0)
            self._ex = ProcessPoolExecutor(max_workers=self.jobs, mp_context=ctx, initializer=_worker_init,
                                           initargs=(counter, self.gpus))
        return self._ex

    def close(self) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=True, cancel_futures=True)
            self._ex = None


class _StagingSync:
    """While a stage runs, snapshot its staging dir to the store every ``$LEVER_STAGING_SYNC_S``
    seconds (S3 only), so a pod rescheduled onto another node resumes instead of restarting.
    Off unless the variable is set: local staging already survives a kill.  Only while the unit's
    lease is ours: a holder cut off past its ttl must not overwrite its successor's snapshot."""

    def __init__(self, store: Store, key: str, lease: Optional[HeldLease] = None):
        import threading

        self.store, self.key, self.lease = store, key, lease
        self.every = float(os.environ.get("LEVER_STAGING_SYNC_S", "0") or 0)
        self._stop = threading.Event()
        self._thread: Optional[Any] = None
        if self.every > 0 and store.is_remote:
            self._thread = threading.Thread(target=self._loop, name=f"staging-sync-{key}", daemon=True)

    def _ours(self) -> bool:
        return self.lease is None or self.lease.valid()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            if not self._ours():
                continue
            try:
                self.store.sync_staging(self.key)
            except Exception as exc:  # a missed snapshot only costs resume progress
                log.warning("staging snapshot of %s failed: %s", self.key, exc)

    def __enter__(self) -> "_StagingSync":
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=60)
            if exc and exc[0] is not None and self._ours():
                try:  # last snapshot of a failing stage: what it managed to write survives the pod
                    self.store.sync_staging(self.key)
                except Exception:
                    pass


def _safe(fn: Optional[Callable], *args: Any) -> None:
    if fn is None:
        return
    try:
        fn(*args)
    except Exception as exc:  # telemetry never fails a stage
        log.debug("telemetry call failed: %s", exc)


def _worker_init(counter: Any = None, gpus: int = 0) -> None:
    """One torch thread per worker: N workers on N cores, not N*N threads fighting.  With GPUs,
    worker i sees only GPU i % gpus (set before torch is imported), so workers do not pile onto
    GPU 0."""
    if counter is not None and gpus > 0:
        with counter.get_lock():
            index = counter.value
            counter.value += 1
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(gpus)]
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[index % len(ids)]
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


_WORKER_PIPES: dict[str, Pipeline] = {}
_WORKER_STORES: dict[str, Store] = {}


def _worker_logging(level: int) -> None:
    """Workers log like their parent (lease waits, stage messages): spawned processes start with
    no logging configuration."""
    lever_log = logging.getLogger("lever")
    if not lever_log.handlers and not logging.getLogger().handlers:
        import sys

        logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    lever_log.setLevel(level)


def _worker_run(payload: dict, stage_name: str, params: tuple, force: bool, fresh: bool,
                wait: bool = True) -> UnitResult:
    import json as _json

    _worker_logging(payload.get("log_level", logging.WARNING))
    ident = _json.dumps([payload["plan"], payload["baseline"], payload["run_id"], payload["store"]], sort_keys=True)
    pipe = _WORKER_PIPES.get(ident)
    if pipe is None:
        plan = PlanConfig.model_validate(payload["plan"])
        baseline = PlanConfig.model_validate(payload["baseline"]) if payload["baseline"] else None
        skey = _json.dumps(payload["store"], sort_keys=True)
        store = _WORKER_STORES.get(skey) or open_store(payload["store"]["url"], payload["store"].get("cache_dir"))
        _WORKER_STORES[skey] = store
        pipe = Pipeline(plan, store, stages=payload["stages"], baseline=baseline, run_id=payload["run_id"])
        _WORKER_PIPES[ident] = pipe
    return pipe.run_unit(stage_name, Unit(stage_name, tuple(tuple(p) for p in params)), force=force, fresh=fresh,
                         wait=wait)


def run_unit(plan: PlanConfig, stage_name: str, unit: Unit, store: Store, run_id: str = "local", *,
             stages: Sequence[Stage] = STAGES, baseline: Optional[PlanConfig] = None, force: bool = False) -> UnitResult:
    """Build (or find cached) one unit of one stage: the call every executor makes."""
    return Pipeline(plan, store, stages=stages, baseline=baseline, run_id=run_id).run_unit(stage_name, unit, force=force)


def gpu_count(plan: PlanConfig) -> int:
    """GPUs the plan's LVLM would use on this machine (0 on CPU plans or machines)."""
    dev = plan.lvlm.device
    if dev.startswith("cuda") or dev == "auto":
        try:
            import torch

            if torch.cuda.is_available():
                return torch.cuda.device_count()
        except ImportError:
            pass
    return 0


def default_jobs(plan: PlanConfig) -> int:
    """Worker processes for fanned-out stages: one per GPU on GPU plans, one per core otherwise."""
    gpus = gpu_count(plan)
    if gpus:
        return gpus
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def stage_closure(names: Iterable[str], stages: Sequence[Stage] = STAGES) -> list[str]:
    """The named stages plus everything they (transitively) read, in graph order."""
    by_name = {s.name: s for s in stages}
    need: set[str] = set()
    todo = list(names)
    while todo:
        n = todo.pop()
        if n in need:
            continue
        need.add(n)
        todo.extend(by_name[n].may_read())
    return [s.name for s in stages if s.name in need]


@dataclass
class RunSummary:
    run_id: str
    results: list[UnitResult] = field(default_factory=list)
    report: Optional[str] = None
    report_key: Optional[str] = None  # the store key of the report unit (``report`` is its location)
    seconds: float = 0.0


def _print(console: Any, msg: str) -> None:
    if console is not None:
        console.print(msg, highlight=False)


def run_stages(pipe: Pipeline, names: Sequence[str], *, jobs: int, console: Any = None, force: Iterable[str] = (),
               fresh: bool = False, label: str = "") -> list[UnitResult]:
    """Run ``names`` of one plan in graph order, printing one line per stage (``cached`` when every
    unit was already in the store) and a progress bar while a fanned-out stage runs."""
    force = set(force)
    out: list[UnitResult] = []
    for i, name in enumerate(names, 1):
        units = pipe.select_units(name)
        t0 = time.monotonic()
        prefix = f"[{i}/{len(names)}] {label}{name}"
        pending = [u for u in units if name in force or pipe.status(name, u) != "cached"]
        if not pending:
            out.extend(UnitResult(name, u.id, pipe.key(name, u), "cached", plan=pipe.plan.name) for u in units)
            _print(console, f"{prefix:<42} [green]cached[/green]" + (f" ({len(units)} units)" if len(units) > 1 else ""))
            continue
        _print(console, f"{prefix:<42} running {len(pending)}/{len(units)} unit(s)"
                        + (f" in {min(jobs, len(pending))} processes" if jobs > 1 and len(pending) > 1 else ""))
        progress = None
        task = None
        if console is not None and len(pending) > 1:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            progress = Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=console, transient=True)
            progress.start()
            task = progress.add_task(name, total=len(units))
            progress.update(task, completed=len(units) - len(pending))

        def tick(r: UnitResult) -> None:
            if progress is not None and task is not None and r.unit in {u.id for u in pending}:
                progress.advance(task)

        try:
            res = pipe.run_stage(name, units, jobs=jobs, force=name in force, fresh=fresh, on_result=tick)
        finally:
            if progress is not None:
                progress.stop()
        out.extend(res)
        built = sum(r.status in ("built", "rebuilt") for r in res)
        rebuilt = sum(r.status == "rebuilt" for r in res)
        shared = sum(r.status == "cached" and r.waited > 0 for r in res)
        extra = f", {rebuilt} rebuilt after failed verification" if rebuilt else ""
        extra += f", {shared} built by another run while this one waited" if shared else ""
        _print(console, f"{prefix:<42} [cyan]built[/cyan] {built} unit(s){extra} in {time.monotonic() - t0:.1f}s")
    return out


def run_plan(
    plan: PlanConfig,
    store: Store,
    *,
    baseline: Optional[PlanConfig] = None,
    stages: Sequence[Stage] = STAGES,
    only: Optional[Sequence[str]] = None,
    jobs: Optional[int] = None,
    run_id: Optional[str] = None,
    force: Iterable[str] = (),
    fresh: bool = False,
    console: Any = None,
    pool: Optional[WorkerPool] = None,
) -> RunSummary:
    """``lever run``: the baseline plan's needed stages (shared units come from the store), then
    every stage of the plan in order.  ``only`` restricts to some stages plus their inputs.
    ``pool``: worker processes owned by the caller (a campaign runs many plans on one pool, so the
    workers load the LVLM once); by default the run starts and closes its own."""
    t0 = time.monotonic()
    pipe = Pipeline(plan, store, stages=stages, baseline=baseline, run_id=run_id)
    summary = RunSummary(pipe.run_id)
    jobs = jobs or default_jobs(plan)
    names = stage_closure(only, stages) if only else [s.name for s in stages]
    base_reads = [n for s in stages if s.name in names and s.with_baseline for n in s.inputs]
    own_pool = pool is None
    pool = pool or WorkerPool(jobs, gpus=gpu_count(plan) if plan.lvlm.device in ("cuda", "auto") else 0)
    pipe.pool = pool
    try:
        if baseline is not None and base_reads:
            bpipe = Pipeline(baseline, store, stages=stages, run_id=pipe.run_id)
            bpipe.pool = pool
            bnames = stage_closure(base_reads, stages)
            _print(console, f"[bold]baseline plan {baseline.name}[/bold] ({len(bnames)} stages)")
            summary.results += run_stages(bpipe, bnames, jobs=jobs, console=console, fresh=fresh, label=f"{baseline.name}:")
        _print(console, f"[bold]plan {plan.name}[/bold] ({len(names)} stages) -> {store.url}")
        summary.results += run_stages(pipe, names, jobs=jobs, console=console, force=force, fresh=fresh)
    finally:
        if own_pool:
            pool.close()
    summary.seconds = time.monotonic() - t0
    report_stage = next((s.name for s in stages if s.with_baseline and s.name in names), None)
    if report_stage is not None:
        unit = pipe.select_units(report_stage)[0]
        summary.report_key = pipe.key(report_stage, unit)
        summary.report = store.location(summary.report_key, "report.md")
    record = {
        "plan": plan.name, "baseline": baseline.name if baseline else None, "run_id": pipe.run_id,
        "store": store.url, "seconds": round(summary.seconds, 2), "report": summary.report,
        "units": [{"plan": r.plan, "stage": r.stage, "unit": r.unit, "key": r.key, "status": r.status,
                   "seconds": round(r.seconds, 2)} for r in summary.results],
    }
    try:
        store.put_json(f"runs/{plan.name}/{pipe.run_id}.json", record)
        store.put_json(f"plans/{plan.name}/latest.json", record)
    except Exception as exc:  # the index is a convenience; the artifacts are committed already
        log.warning("could not write the run record: %s", exc)
    return summary
