"""A wrapper around graphopt's CPU schedule entry point that records the PrimFuncs arriving already scheduled
(that is, by a tuning database): how the tuning tests see that records were applied."""


def recording_hook(applied: list):
    """A replacement for cpu_schedules.schedule_module that appends the names of pre-scheduled functions to
    `applied`, then schedules as usual. CpuTarget.lower imports schedule_module at call time, so patching the
    module attribute is enough."""
    from graphopt.targets import cpu_schedules
    real = cpu_schedules.schedule_module

    def hook(mod, target):
        import tvm
        for gv, f in mod.functions.items():
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "tirx.is_scheduled" in f.attrs:
                applied.append(gv.name_hint)
        return real(mod, target)
    return hook
