"""The static-table HPACK encoder used for what Bastion sends on HTTP/2: any HPACK decoder reads it back."""

from hpack import Decoder

from bastion.http.h2_server import StaticTableEncoder


def decode(decoder, block):
    return decoder.decode(block, raw=True)


def test_round_trip_through_a_real_decoder():
    encoder, decoder = StaticTableEncoder(), Decoder()
    headers = [
        (b":status", b"200"),  # fully in the static table
        (b":status", b"418"),  # name only
        (b"content-type", b"application/grpc"),
        (b"x-custom", b"v" * 300),  # new name, a length beyond the 7-bit prefix
        (b"x-" + b"n" * 200, b""),
        (b"grpc-status", b"0"),
    ]
    assert decode(decoder, encoder.encode(headers)) == headers
    assert decode(decoder, encoder.encode(headers)) == headers  # again, from the cache
    assert decoder.header_table_size == 0  # nothing was ever added to the dynamic table


def test_announces_an_empty_dynamic_table_once_and_after_a_settings_change():
    encoder = StaticTableEncoder()
    first = encoder.encode([(b":status", b"200")])
    second = encoder.encode([(b":status", b"200")])
    assert first == b"\x20\x88" and second == b"\x88"
    encoder.header_table_size = 0  # what h2 does when the peer's SETTINGS_HEADER_TABLE_SIZE changes
    assert encoder.encode([(b":status", b"200")]) == b"\x20\x88"


def test_lengths_on_both_sides_of_the_integer_prefix():
    encoder, decoder = StaticTableEncoder(), Decoder()
    for size in (0, 1, 14, 15, 16, 126, 127, 128, 300, 20000):
        headers = [(b"content-type", b"t" * size), (b"x" * (size or 1), b"v" * size), (b"x-request-id", b"%d" % size)]
        assert decode(decoder, encoder.encode(headers)) == headers
