"""lever.obs"""
