"""historian"""
