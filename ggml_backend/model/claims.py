"""Work shared by the threads of one parallel launch: atomic counters that hand out tasks and count them done, a
spin wait for a count, and the call of a worker by its address (``decode_step``'s layer region, one launch for a
whole layer of a decode step).

The counters are int64 array elements updated by ``lock xadd`` (sequentially consistent: what a thread wrote before
counting a task done is visible to a thread that reads the count). A thread waits only for tasks another thread has
already claimed, so a launch whose second thread starts late, or never, still finishes: the first claims every task.
"""
from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic


def _counter_pointer(context, builder, sig, args):
    array = context.make_array(sig.args[0])(context, builder, args[0])
    index = context.cast(builder, args[1], sig.args[1], types.intp)
    return builder.gep(array.data, [index])


def _is_counter_array(array, index) -> bool:
    return (isinstance(array, types.Array) and array.dtype == types.int64 and array.layout == "C"
            and isinstance(index, types.Integer))


@intrinsic
def fetch_add(typingctx, counters, index, value):
    """``counters[index] += value`` atomically (int64, sequentially consistent); the value before."""
    if not _is_counter_array(counters, index) or not isinstance(value, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        pointer = _counter_pointer(context, builder, sig, args)
        amount = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("add", pointer, amount, "seq_cst")
    return types.int64(counters, index, value), codegen


@intrinsic
def read_counter(typingctx, counters, index):
    """``counters[index]`` by an atomic load (acquire: what was written before it was counted is visible after)."""
    if not _is_counter_array(counters, index):
        return None

    def codegen(context, builder, sig, args):
        return builder.load_atomic(_counter_pointer(context, builder, sig, args), "acquire", 8)
    return types.int64(counters, index), codegen


@intrinsic
def spin_pause(typingctx):
    """x86's ``pause``: a spinning thread yields its core's pipeline to the other hyperthread and saves power."""
    def codegen(context, builder, sig, args):
        function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                  "llvm.x86.sse2.pause")
        builder.call(function, [])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def call_worker(typingctx, address, me, n_workers, table, eps, scale):
    """Call the C function at ``address`` (int64), ``void f(int64 me, int64 n_workers, int64 *table, float eps,
    float scale)``, with the data of the int64 array ``table``: a compiled ``cfunc`` called by address is not linked
    into the caller's code, so the caller's compile does not optimize the callee's again."""
    if not (isinstance(address, types.Integer) and isinstance(me, types.Integer)
            and isinstance(n_workers, types.Integer) and _is_counter_array(table, me)
            and eps == types.float32 and scale == types.float32):
        return None

    def codegen(context, builder, sig, args):
        address, me, n_workers, table, eps, scale = args
        i64 = ir.IntType(64)
        function_type = ir.FunctionType(ir.VoidType(), [i64, i64, i64.as_pointer(), ir.FloatType(), ir.FloatType()])
        function = builder.inttoptr(context.cast(builder, address, sig.args[0], types.int64),
                                    function_type.as_pointer())
        data = context.make_array(sig.args[3])(context, builder, table).data
        builder.call(function, [context.cast(builder, me, sig.args[1], types.int64),
                                context.cast(builder, n_workers, sig.args[2], types.int64), data, eps, scale])
        return context.get_dummy_value()
    return types.void(address, me, n_workers, table, eps, scale), codegen


@njit(inline="always", nogil=True)
def claim(counters, index):
    """The next task of the phase whose claim counter is ``counters[index]`` (0, 1, ...: past its last one when
    they are all taken)."""
    return fetch_add(counters, index, 1)


@njit(inline="always", nogil=True)
def count_done(counters, index):
    """One more task of the phase whose done counter is ``counters[index]`` finished (its results written)."""
    fetch_add(counters, index, 1)


@njit(nogil=True)
def wait_for(counters, index, target):
    """Spin until ``counters[index]`` reaches ``target`` (the tasks waited for are running on other threads)."""
    while read_counter(counters, index) < target:
        spin_pause()
