from pathlib import Path

from lab import evidence

FIX = Path(__file__).parent / "fixtures" / "trace"


def test_interleaving_is_flagged():
    a = evidence.analyze_file(FIX / "veth-interleaved.trace")
    assert a.receives == 5 and a.flushes == 2
    # ts 1003: CPU1 receives while CPU0 holds two unflushed receives into the same socket
    assert a.window_hits == 1
    assert a.examples[0]["cpu"] == 1 and a.examples[0]["unflushed_on"] == {0: 2}
    assert a.first_hit_ts == 1003
    assert a.marks and '"kind":"order"' in a.marks[0]


def test_serialised_receives_are_clean():
    a = evidence.analyze_file(FIX / "veth-serialised.trace")
    assert a.receives == 5 and a.flushes == 3
    assert a.window_hits == 0 and a.cpus == {0, 1}
    # two sockets receiving on different CPUs at once is not the race
    assert a.sockets == 2


def test_out_of_order_lines_are_sorted_by_counter():
    lines = [
        "  a-1 [001] ..s1. 12: flush: (xsk_flush+0x0/0x60) xs=0x10",
        "  a-1 [001] ..s1. 10: rcv: (__xsk_rcv_zc+0x0/0x1) xs=0x10",
        "  b-2 [000] ..s1. 11: rcv: (__xsk_rcv_zc+0x0/0x1) xs=0x10",
    ]
    assert evidence.analyze(lines).window_hits == 1
    assert evidence.analyze(sorted(lines, key=lambda l: int(l.split()[3][:-1]))).window_hits == 1


def test_clock_name_parsing():
    assert evidence._current_clock("local [counter] global uptime") == "counter"


def test_flushall_clears_every_socket_of_its_cpu():
    lines = [
        "  a-1 [000] ..s1. 1: rcv: (__xsk_rcv_zc+0x0/0x1) xs=0x10",
        "  a-1 [000] ..s1. 2: rcv: (__xsk_rcv_zc+0x0/0x1) xs=0x20",
        "  a-1 [000] ..s1. 3: flushall: (__xsk_map_flush+0x0/0x1)",
        "  b-2 [001] ..s1. 4: rcv: (__xsk_rcv_zc+0x0/0x1) xs=0x10",
        "  b-2 [001] ..s1. 5: rcv: (__xsk_rcv_zc+0x0/0x1) xs=0x20",
    ]
    assert evidence.analyze(lines).window_hits == 0
    assert evidence.analyze(lines[:2] + lines[3:]).window_hits == 2


def test_overlap_inside_receive_for_the_generic_race():
    lines = [
        "  a-1 [000] ..s1. 1: rcv: (__xsk_rcv+0x0/0x1) xs=0x10",
        "  b-2 [001] ..s1. 2: rcv: (__xsk_rcv+0x0/0x1) xs=0x10",     # CPU0 still inside: overlap
        "  a-1 [000] ..s1. 3: rcvret: (xsk_generic_rcv+0x5/0x1 <- __xsk_rcv)",
        "  b-2 [001] ..s1. 4: rcvret: (xsk_generic_rcv+0x5/0x1 <- __xsk_rcv)",
        "  a-1 [000] ..s1. 5: rcv: (__xsk_rcv+0x0/0x1) xs=0x10",     # nobody inside: serialised
        "  a-1 [000] ..s1. 6: rcvret: (xsk_generic_rcv+0x5/0x1 <- __xsk_rcv)",
        "  b-2 [001] ..s1. 7: rcv: (__xsk_rcv+0x0/0x1) xs=0x20",     # another socket: not the race
    ]
    a = evidence.analyze(lines)
    assert a.overlap_hits == 1 and a.receives == 4
    assert evidence.window_measure("generic-rx-race") == "overlap_hits"
    assert evidence.window_measure("veth-napi-race") == "unflushed_hits"


def test_events_before_every_cpu_has_data_are_ignored():
    # CPU0's buffer wrapped: its flush at ts 1 is gone, so CPU1's early events look unflushed
    lines = [
        "# entries-in-buffer/entries-written: 4/9   #P:2",
        "  b-2 [001] ..s1. 2: rcv: (__xsk_rcv+0x0/0x1) xs=0x10",
        "  a-1 [000] ..s1. 3: rcv: (__xsk_rcv+0x0/0x1) xs=0x10",
        "  a-1 [000] ..s1. 4: flushall: (__xsk_map_flush+0x0/0x1)",
        "  b-2 [001] ..s1. 5: flushall: (__xsk_map_flush+0x0/0x1)",
    ]
    a = evidence.analyze(lines)
    assert a.window_hits == 0 and a.skipped == 1 and a.lost == 5
    # nothing lost: everything counts
    assert evidence.analyze(lines[1:]).window_hits == 1
