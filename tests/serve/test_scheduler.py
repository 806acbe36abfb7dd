"""The queue in front of the Generator, on the tiny HF model: jobs run one at a time in arrival
order, a job cancelled while it waits never reaches the model, the bound is --max-concurrency,
and every job's media are released exactly when its generation is over."""
import asyncio

import pytest

from megatron_vita.inference.api import SamplingParams, single_turn
from megatron_vita.serve.scheduler import Job, Scheduler
from megatron_vita.serve.settings import ApiError

QUESTIONS = ["What colour is the shape?", "Describe the video.", "Hello, how are you today?",
             "What is in the picture?"]


class Recording:
    """The real generator, noting which questions reach it and in what order."""

    def __init__(self, generator):
        self.generator, self.seen = generator, []

    def generate(self, request):
        self.seen.append(request.turns[-1].content)
        return self.generator.generate(request)

    def stream(self, request):
        self.seen.append(request.turns[-1].content)
        return self.generator.stream(request)


@pytest.mark.timeout(120)
def test_fifo_one_at_a_time_cancelled_waiters_skipped(generator):
    model = Recording(generator)
    scheduler = Scheduler(model, max_concurrency=len(QUESTIONS))
    released = []

    async def scenario():
        loop = asyncio.get_running_loop()
        jobs = [Job(single_turn(q, sampling=SamplingParams(max_new_tokens=2)), i % 2 == 1, loop,
                    cleanup=lambda q=q: released.append(q)) for i, q in enumerate(QUESTIONS)]
        for job in jobs:
            scheduler.submit(job)
        with pytest.raises(ApiError, match="--max-concurrency 4") as busy:
            scheduler.submit(Job(single_turn("one more"), False, loop))
        assert busy.value.status == 429
        jobs[2].cancel()  # its client left while it waited (the first job is still generating)
        finished = []
        for i, job in enumerate(jobs):
            if i == 2:
                continue
            text = ""
            while True:
                kind, value = await job.events.get()
                if kind == "piece":
                    text += value
                    continue
                assert kind == "done", value
                finished.append((i, value.text if value is not None else text))
                break
        return finished

    finished = asyncio.run(scenario())
    scheduler.close()
    expected = [i for i in range(len(QUESTIONS)) if i != 2]
    assert model.seen == [QUESTIONS[i] for i in expected]  # arrival order; the cancelled one never ran
    for i, text in finished:
        assert text == generator.generate(single_turn(QUESTIONS[i], sampling=SamplingParams(max_new_tokens=2))).text
    assert sorted(released) == sorted(QUESTIONS)  # every job's media released, the skipped one too
    stats = scheduler.stats()
    assert (stats["completed"], stats["cancelled"], stats["running"], stats["waiting"]) == (3, 1, 0, 0)
