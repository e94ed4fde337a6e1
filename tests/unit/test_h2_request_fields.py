"""Request-field checks and the header-block cache of Bastion's HTTP/2 server side."""

from hpack import Encoder

from bastion.http.h2_server import CachingDecoder, field_is_valid, websocket_accept


def test_field_rules():
    assert field_is_valid(b"x-ok", b"a value")
    assert field_is_valid(b"te", b"trailers")
    assert not field_is_valid(b"X-Up", b"v")
    assert not field_is_valid(b"x sp", b"v")
    assert not field_is_valid(b"x-a", b"a\r\nb")
    assert not field_is_valid(b"x-a", b"nul\x00")
    assert not field_is_valid(b"x-a", b" leading")
    assert not field_is_valid(b"x-a", b"trailing\t")
    assert not field_is_valid(b"connection", b"close")
    assert not field_is_valid(b"transfer-encoding", b"chunked")
    assert not field_is_valid(b"te", b"gzip")
    assert not field_is_valid(b"", b"v")


def test_cached_blocks_follow_the_dynamic_table():
    encoder, decoder = Encoder(), CachingDecoder(65536)
    first = [(b":method", b"GET"), (b":path", b"/a"), (b"x-tag", b"one")]
    block = encoder.encode(first)  # inserts into the table: not cached
    assert decoder.decode(block, raw=True) == first
    again = encoder.encode(first)  # only references now: cached after this
    assert decoder.decode(again, raw=True) == first
    assert decoder.decode(again, raw=True) == first
    assert decoder.blocks
    # a new insertion shifts every index: the same bytes would mean other fields, so the cache is dropped
    other = [(b":method", b"GET"), (b":path", b"/a"), (b"x-tag", b"two")]
    assert decoder.decode(encoder.encode(other), raw=True) == other
    assert not decoder.blocks
    assert decoder.decode(encoder.encode(first), raw=True) == first
    assert decoder.decode(encoder.encode(other), raw=True) == other


def test_websocket_accept_is_rfc6455s():
    assert websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 1.3
