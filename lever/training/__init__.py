"""lever.training"""
