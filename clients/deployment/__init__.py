"""What the server site and the client sites need to run Flower's deployment engine:
Flower's own executables from fedguard's environment, the federation's TLS certificates
and the SuperNodes' authentication keys (``fedguard certs`` / ``fedguard keys``)."""
