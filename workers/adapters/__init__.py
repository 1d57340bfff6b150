"""Draft-to-target adapters: collection (`collect`), models (`models`), training (`train`), offline
evaluation (`evaluate`) and the live hook for the draft's TokenEngine (`live`).

Import the submodules directly; this package imports nothing heavy so the coordinator can name it.
"""
