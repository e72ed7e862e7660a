"""lungsam.reproduce"""
