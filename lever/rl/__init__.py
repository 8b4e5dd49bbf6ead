"""lever.rl"""
