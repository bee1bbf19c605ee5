"""The base layer every other package may use: errors, registries, configs, files, devices and seeds.

It imports nothing else from adasmooth.
"""
