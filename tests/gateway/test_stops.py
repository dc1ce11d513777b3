from arserve.gateway.stops import StopMatcher


def run(stops, pieces):
    m = StopMatcher(stops)
    out = []
    for p in pieces:
        out.append(m.feed(p))
        if m.stopped:
            return out, True
    out.append(m.flush())
    return out, False


def test_stop_across_chunks_is_never_shown():
    out, stopped = run(["END"], ["abc E", "N", "D more"])
    assert stopped and "".join(out) == "abc " and out[0] == "abc "


def test_held_text_is_released_when_it_stops_matching():
    out, stopped = run(["END"], ["x E", "Nd", "!"])
    assert not stopped and "".join(out) == "x ENd!"
    assert out[0] == "x "  # "E" held back while it could start "END"


def test_earliest_of_several_stops_wins_and_no_stops_passes_through():
    out, stopped = run(["b", "cd"], ["acdb"])
    assert stopped and out == ["a"]
    out, stopped = run([], ["anything"])
    assert not stopped and "".join(out) == "anything"
