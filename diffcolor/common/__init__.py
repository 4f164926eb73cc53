"""What the method and the archive must agree on, written once.

Pure Python (the standard library and numpy, nothing that loads a model):
the error classes whose kind decides retries, the caption rules (which words
take colours), the item-id rule, the hashes behind cache keys, the header of a
safetensors file and the scaling of RGB arrays to [0, 1]. Both sides import
from here; nothing here imports either side.
"""
