"""models/vision"""
