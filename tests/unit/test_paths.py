import pytest

from bastion.http.paths import normalize_path


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b"/a/./b", b"/a/b"),
        (b"/a/../b", b"/b"),
        (b"/../../etc/passwd", b"/etc/passwd"),
        (b"/a/b/..", b"/a/"),
        (b"/a/.", b"/a/"),
        (b"/.hidden/x", b"/.hidden/x"),
        (b"/a/b/../../..", b"/"),
    ],
)
def test_dot_segments_are_removed_and_never_climb_above_root(raw, expected):
    assert normalize_path(raw) == expected
