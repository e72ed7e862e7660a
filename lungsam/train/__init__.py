"""lungsam.train"""
