"""lungsam.runtime"""
