"""lever.selectors"""
