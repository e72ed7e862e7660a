"""lungsam.benchmarks"""
