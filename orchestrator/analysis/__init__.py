"""Reading runs afterwards: the invariant audit, trace files and their merge, exports."""
