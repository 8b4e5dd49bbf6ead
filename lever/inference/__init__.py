"""lever.inference"""
