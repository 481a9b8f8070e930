"""loopscope.bench"""
