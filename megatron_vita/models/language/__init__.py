"""models/language"""
