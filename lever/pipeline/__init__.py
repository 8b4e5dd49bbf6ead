"""lever.pipeline"""
