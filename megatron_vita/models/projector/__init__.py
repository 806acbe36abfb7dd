"""models/projector"""
