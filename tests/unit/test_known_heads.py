from bastion.http.known_heads import PAUSE, SIZE, KnownHeads


def test_a_table_that_pays_keeps_remembering():
    heads = KnownHeads()
    for round_ in range(3):
        for i in range(SIZE):
            heads.remember(b"head %d %d" % (round_, i), (i,))
            heads.hits += 1  # each head looked up again once
    heads.remember(b"one more", (0,))
    assert heads.paused == 0 and heads.entries == {b"one more": (0,)}


def test_heads_that_never_repeat_pause_the_table():
    heads = KnownHeads()
    for i in range(SIZE):
        heads.remember(b"head %d" % i, (i,))
    assert len(heads.entries) == SIZE and heads.paused == 0
    heads.remember(b"head after", (0,))
    assert heads.paused == PAUSE and heads.entries == {}
