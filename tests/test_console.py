"""What reaches the driver's console from Ray's processes, and where the rest goes (``pipeline.console``)."""

import shutil


def test_ray_lines_go_to_the_run_log_while_it_runs_and_never_bring_back_its_removed_folder(tmp_path, capsys):
    """During a run, Ray's own lines go to its ``ray.log`` and gdml's reach the console; after it, Ray goes on
    printing (the autoscaler's status), and those lines must not recreate the run's folder once it is removed (a
    benchmark's temporary folder came back that way)."""
    import ray._private.worker as ray_worker

    from pipeline.console import RayConsole

    RayConsole.install()

    def say(line: str, pid: object = 7) -> None:  # looked up at each call, as Ray's driver does
        ray_worker.print_worker_logs({"lines": [line], "pid": pid, "ip": "127.0.0.1", "localhost": "127.0.0.1",
                                      "actor_name": "RayTrainWorker"}, ray_worker.sys.stdout)

    outer, inner = tmp_path / "sweep" / "ray.log", tmp_path / "retrain" / "ray.log"
    with RayConsole.for_run(outer, progress=False):
        say("INFO report 1 from Ray Train")
        with RayConsole.for_run(inner, progress=False):  # a sweep's final retrain: a run inside the sweep
            say("INFO the retrain's own line")
            say("gdml: epoch 1/1 of the retrain")
        say("INFO the sweep's again")
    assert outer.read_text().splitlines() == ["(RayTrainWorker pid=7) INFO report 1 from Ray Train",
                                              "(RayTrainWorker pid=7) INFO the sweep's again"]
    assert inner.read_text().splitlines() == ["(RayTrainWorker pid=7) INFO the retrain's own line"]
    out = capsys.readouterr().out
    assert "gdml: epoch 1/1 of the retrain" in out and "INFO" not in out

    shutil.rmtree(tmp_path / "sweep")
    shutil.rmtree(tmp_path / "retrain")
    say("Resources: 0/4 CPU", pid="autoscaler")  # after the run
    assert sorted(tmp_path.iterdir()) == []
