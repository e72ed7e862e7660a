"""lungsam.export"""
