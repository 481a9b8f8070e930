"""loopscope.profiles"""
