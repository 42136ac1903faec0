"""What travels: the message types (messages.py), their byte format with the codecs payloads (serde.py) and
the gRPC service definition (splitcom.proto and its generated modules)."""
