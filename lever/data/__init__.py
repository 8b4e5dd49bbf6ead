"""lever.data"""
