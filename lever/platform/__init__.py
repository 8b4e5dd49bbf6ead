"""lever.platform"""
