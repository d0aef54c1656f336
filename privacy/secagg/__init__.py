"""fedguard's SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020) on vetted primitives.

``keys`` (X25519 + HKDF), ``envelope`` (AES-GCM share encryption), ``shamir``
(pycryptodome's Shamir sharing), ``masking`` (ChaCha20 masks, quantization, in-place
modular arithmetic) and ``protocol`` (the four stages as transport-free client and
server sessions). The Flower wiring lives in ``clients/secure_aggregation.py`` and
``server/secure_aggregation.py``.
"""
