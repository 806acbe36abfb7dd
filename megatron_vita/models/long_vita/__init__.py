"""models/long_vita"""
