"""lever.sampling"""
