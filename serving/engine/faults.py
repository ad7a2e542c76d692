"""What the engine does when a device step fails: the instance leaves service for good, every request it held
starts over on the live instances (its prompt and the tokens produced so far prefilled again: the same tokens),
migrations to or from it are undone, and requests no live instance can serve fail with the reason."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from serving.engine.request import EngineRequest, Phase
from serving.model import Group, InstState, Stage

if TYPE_CHECKING:
    from serving.engine.engine import EngineInstance

MAX_RESTARTS = 2  # a request in this many failed steps is failed itself (it may be what breaks them)


class FaultHandling:
    """Mixed into `Engine` (its state and lock are the engine's)."""

    def inject_fault(self, iid: int) -> None:
        """Make instance `iid`'s next step fail, as a device error would (fault-tolerance tests)."""
        with self.lock:
            self.insts[iid].fault = True
            self.lock.notify_all()

    def _live(self, inst: EngineInstance) -> bool:
        return inst.state != InstState.FAILED

    def _instance_failed(self, inst: EngineInstance, kind: str, payload, error: str) -> None:
        """A step failed: the instance leaves service for good (its pool, donated to the step, may be gone). Every
        request it held starts over on the live instances: its prompt and the tokens it already produced are
        prefilled again (the same next token as decode would give: greedy and seeded sampling alike). A request
        in MAX_RESTARTS failed steps fails itself, with the error."""
        inst.state = InstState.FAILED
        inst.pending_target = None
        if inst.prefix is not None:
            inst.prefix.blocks.clear()  # its pool is abandoned with the device
        in_step = {id(r) for r in self._step_requests(kind, payload)}
        victims: list[EngineRequest] = []
        for queue in [*self.q.values(), inst.local_queue]:
            for r in [r for r in queue if r.owner == inst.iid or queue is inst.local_queue]:
                queue.remove(r)
                victims.append(r)
        victims += inst.prefilling + inst.encoding + list(inst.running.values())
        inst.prefilling.clear()
        inst.encoding.clear()
        inst.running.clear()
        inst.local_queue.clear()
        # migrations that involve it: in its outgoing / incoming queues, or the step that failed
        moving = [m for m in inst.outgoing] + [m for m, _ in inst.incoming]
        if kind in ("export", "import"):
            moving.append(payload if kind == "export" else payload[0])
        for other in self.insts:
            if other is not inst:
                moving += [m for m in other.outgoing if m.target is inst]
                moving += [m for m, _ in other.incoming if m.source is inst]
                other.outgoing = deque(m for m in other.outgoing if m.target is not inst)
                other.incoming = deque((m, d) for m, d in other.incoming if m.source is not inst)
        inst.outgoing.clear()
        inst.incoming.clear()
        for m in moving:
            if m.target is not inst:  # the destination lives: give back what it reserved
                m.target.pool.release(m.new_ids)
                m.target.reserved -= m.growth
                m.target.arriving -= 1
            elif m.source is not inst and m.request.owner == m.source.iid:  # the source lives and still owns it
                m.source.pool.release(m.request.kv.owned())
            victims.append(m.request)
        for served in self.contexts.values():
            served.resident.pop(inst.iid, None)
            served.loading.discard(inst.iid)
        inst.context_loads.clear()
        seen = set()
        for r in sorted(victims, key=lambda r: r.rid):
            if r.rid in seen or r.phase == Phase.DONE:
                continue
            seen.add(r.rid)
            r.kv, r.owner, r.prefilled, r.copies = None, -1, 0, None
            r.restarts += id(r) in in_step
            if r.restarts >= MAX_RESTARTS:
                self._finish(r, "error", f"{error} (the request was in {r.restarts} failed steps)")
            else:
                self._requeue(r)
        self._fail_unservable(error)

    @staticmethod
    def _step_requests(kind: str, payload) -> list[EngineRequest]:
        if kind == "prefill":
            return [r for r, _ in payload]
        if kind in ("decode", "encode"):
            return list(payload)
        if kind in ("export", "import"):
            return [(payload if kind == "export" else payload[0]).request]
        return []

    def _requeue(self, r: EngineRequest) -> None:
        if r.todo_media and not self.inline_encode:
            r.phase = Phase.QUEUED
            self.q[(r.group, Stage.ENCODE)].appendleft(r)
            return
        self._enqueue_prefill(r, front=True)

    def _fail_unservable(self, error: str) -> None:
        """Requests that no live instance can serve any more fail now, with the reason."""
        live = [i for i in self.insts if self._live(i)]
        if not live:
            for q in [*self.q.values(), *(i.local_queue for i in self.insts)]:
                q.clear()
            for r in list(self.requests.values()):
                self._finish(r, "error", f"no instance is left in service ({error})")
            return
        for (g, s), q in self.q.items():
            if q and self._unservable(g, s):
                for r in list(q):
                    q.remove(r)
                    self._finish(r, "error", f"no live {g.name}/{s.name} instance is left ({error})")

    def _unservable(self, g: Group, s: Stage) -> bool:
        """No live instance has (or is switching to) this role, and the policy never re-assigns instances (a
        ticking policy such as ElasticMM covers an empty stage at its next tick)."""
        if getattr(self.policy, "tick_interval", None):
            return False
        return not any(self._live(i) and ((i.group, i.stage) == (g, s) or self.effective_role(i) == (g, s))
                       for i in self.insts)
