"""The library the three entrypoints share: records, the encoder, the negative store, search.

Entrypoints (training/, mining/, data_gen/) import this package and never each other.
"""
