import asyncio

from arserve.gateway.stops import StopMatcher, tokens_through_stop


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


def test_the_stop_that_completes_first_wins_however_the_text_is_cut():
    """"b" completes at 2, "abc" at 3: one piece or one character at a time
    (a speculative round or plain decoding), the text is the same."""
    for pieces in (["abcd"], list("abcd"), ["ab", "cd"]):
        out, stopped = run(["abc", "b"], pieces)
        assert stopped and "".join(out) == "a", pieces
    out, stopped = run(["bc", "abc"], ["xabc"])  # both end at 4: the longer one starts first
    assert stopped and out == ["x"]


def test_token_ids_run_through_the_token_that_completes_the_stop():
    """Tokens "a", "bE", "N", "D!", "x": the stop "END" starts inside "bE"
    and completes in "D!": three tokens are kept after "a" was released, the
    straddling one among them, none after."""
    texts = {1: "a", 2: "bE", 3: "N", 4: "D!", 5: "x"}

    async def decode(token: int, last: bool) -> str:
        return texts[token]

    m = StopMatcher(["END"])
    assert m.feed("a") == "a"
    before = m.snapshot()
    assert m.feed("bEND!x") == "b" and m.stopped
    assert asyncio.run(tokens_through_stop(before, [2, 3, 4, 5], decode)) == 3
    assert not before.stopped  # the replay leaves the snapshot as it was
