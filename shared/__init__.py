"""What the web front end and the workers both use: settings, errors, image decoding.

Light on purpose: Pillow and NumPy, never torch or Flask.
"""
