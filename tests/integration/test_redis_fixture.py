"""The suite's own Redis server answers (the cache and the shared limits depend on it)."""


def test_redis_server_answers(redis_server):
    redis_server.flush()
    assert redis_server.command("SET", "k", "v") == "+OK"
    assert redis_server.command("GET", "k") == "$1"
    redis_server.flush()
    assert redis_server.command("GET", "k") == "$-1"
