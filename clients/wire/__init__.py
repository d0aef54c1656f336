"""The message protocol the ServerApp and the ClientApp both speak.

Record and key names (:mod:`.protocol`), the checks every received message passes before
use (:mod:`.checks`) and the flat-vector view of a model's arrays (:mod:`.arrays`). It
lives under clients/ because the server may import clients/ and not the other way round.
"""
