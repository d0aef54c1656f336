"""fedguard's SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020) on vetted primitives.

``keys`` (X25519 + HKDF), ``envelope`` (AES-GCM share encryption), ``shamir``
(pycryptodome's Shamir sharing), ``masking`` (ChaCha20 masks, quantization, in-place
modular arithmetic), ``params`` (parameters, the hash-seeded neighbour graph),
``protocol`` and ``server_session`` (the stages as transport-free client and server
sessions), ``identity`` (Ed25519 site identities, the pinned roster, signed adverts and
survivor sets), ``policy`` (a site's own limits on k, t and colluders), ``reconstruct``
(rebuilding secrets when some revealed shares are bad) and ``risk`` (exposure figures).
The Flower wiring lives in ``clients/secure_aggregation.py`` and
``server/secure_aggregation.py``.
"""
