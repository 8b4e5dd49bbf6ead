"""lever.models"""
