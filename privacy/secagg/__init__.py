"""Building blocks for SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020) on vetted primitives.

Work in progress towards fedguard's own SecAgg+ on Flower's Message API: these modules
hold the cryptography and arithmetic (key agreement, authenticated share encryption,
Shamir sharing, cryptographic mask expansion, quantization); the protocol stages and
their wiring into the ServerApp/ClientApp are not built yet.
"""
