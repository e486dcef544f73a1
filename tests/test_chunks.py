import subprocess
import sys

from kvctl.server.chunks import chunk_refs


def test_partial_last_chunk_is_kept():
    refs = chunk_refs(list(range(600)), 256)
    assert [(r.start, r.end) for r in refs] == [(0, 256), (256, 512), (512, 600)]
    assert refs[-1].num_tokens == 88


def test_keys_name_whole_prefixes():
    a = chunk_refs(list(range(600)), 256)
    b = chunk_refs(list(range(512)) + [7] * 88, 256)
    # same first two chunks, different third
    assert [r.key for r in a[:2]] == [r.key for r in b[:2]]
    assert a[2].key != b[2].key
    # same tokens in chunk 2 but a different first chunk: different key
    c = chunk_refs([1, *range(1, 600)], 256)
    assert c[1].key != a[1].key


def test_chunk_size_is_part_of_the_key():
    assert chunk_refs([1, 2, 3], 256)[0].key != chunk_refs([1, 2, 3], 128)[0].key


def test_keys_are_stable_across_processes():
    code = ("from kvctl.server.chunks import chunk_refs;"
            "print(','.join(r.key for r in chunk_refs(list(range(300)), 256)))")
    outs = set()
    for seed in ("1", "2"):
        outs.add(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True, env={"PYTHONHASHSEED": seed}).stdout)
    assert len(outs) == 1
    assert outs.pop().strip() == ",".join(r.key for r in chunk_refs(list(range(300)), 256))


def test_empty_tokens_have_no_chunks():
    assert chunk_refs([], 256) == []
