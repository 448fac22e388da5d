from t2i_train.bench.sampling import main, run


def test_sampling_bench_smoke(capsys):
    res = run("pixeldit_tiny_t2i", size=16, batch=2, steps=3, repeats=1)
    assert res["model_calls"] == 3 and res["steps"] == 3  # one batched cond+uncond forward per step
    assert res["run_s"] > 0 and res["forward_x_steps_s"] > 0
    assert abs(res["ratio"] - res["run_s"] / res["forward_x_steps_s"]) < 0.05
    assert res["ratio_best"] > 0 and res["in_run_overhead_pct"] > -100 and res["free_model_run_s"] > 0
    assert main(["--preset", "pixeldit_tiny_c2i", "--size", "16", "--steps", "2", "--repeats", "1",
                 "--sampler", "flow_dpm_solver"]) == 0
    assert "sampler overhead" in capsys.readouterr().out
