"""loopscope.reports"""
