/*
 * hpcckpt_spank.c - SPANK plugin: `#SBATCH --checkpoint=SCHEDULE` runs the batch script
 * under `hpcckpt run --store SITE_STORE --schedule SCHEDULE -- SCRIPT ARGS...`.
 *
 * Registered in plugstack.conf (one line; arguments are the site's settings):
 *
 *   optional /path/hpcckpt_spank.so store=/shared/ckpt hpcckpt=/opt/hpcckpt/bin/hpcckpt \
 *            exec=/path/hpcckpt-spank-exec [args="--keep-last 3"]
 *
 * How: the option is registered with spank_option_register() in slurm_spank_init (Slurm
 * 22.05's sbatch ignores a static spank_options table). In the batch step only, just
 * before slurmstepd execs the script, slurm_spank_task_init replaces argv[0] (the
 * script) by the small exec wrapper and passes the script, store, schedule and hpcckpt
 * path in the job's environment (spank_setenv edits the very array slurmstepd passes to
 * execve). Everything slurmstepd does after the hook (TaskProlog, TMPDIR, user limits)
 * still happens, and the wrapper execs hpcckpt, so the batch shell's signals (preemption
 * SIGTERM, --signal=B:...) reach `hpcckpt run` itself.
 *
 * srun steps inside the job are left alone: the option is forwarded to them through the
 * job's environment, but their processes are already children of the batch script that
 * hpcckpt checkpoints as a whole.
 *
 * Privileges: slurm_spank_task_init runs as the job's user. `hpcckpt run` needs root
 * (its own PID namespace, clone3 set_tid, PR_SET_MM_MAP), so on a site whose jobs are not
 * root the wrapper must talk to a root service (issue 7, hpcckptd) instead; see
 * docs/slurm.md. The plugin itself never gives the job more privilege than it has.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <slurm/slurm.h>
#include <slurm/spank.h>

SPANK_PLUGIN(hpcckpt, 1);

#define OPT_NAME "checkpoint"

static char *schedule;          /* the --checkpoint value, NULL when not given */
static char *site_store;        /* store= from plugstack.conf */
static char *hpcckpt_path;      /* hpcckpt= : the hpcckpt executable */
static char *exec_path;         /* exec= : the wrapper that runs hpcckpt */
static char *extra_args;        /* args= : more `hpcckpt run` options, e.g. --keep-last 3 */

static int opt_checkpoint(int val, const char *optarg, int remote)
{
	(void) val;
	(void) remote;
	if (!optarg || !*optarg) {
		slurm_error("hpcckpt: --checkpoint needs a schedule, e.g. --checkpoint=every=30m "
			    "or --checkpoint=hourly");
		return -1;
	}
	if (strpbrk(optarg, "\n\r")) {
		slurm_error("hpcckpt: --checkpoint=%s: a schedule is one line", optarg);
		return -1;
	}
	free(schedule);
	schedule = strdup(optarg);
	return 0;
}

static struct spank_option checkpoint_option = {
	OPT_NAME, "SCHEDULE",
	"checkpoint the batch script's processes with hpcckpt per SCHEDULE (a site schedule "
	"name such as hourly, or an inline spec such as every=30m); a requeued job resumes "
	"from its newest checkpoint",
	1, 0, opt_checkpoint
};

static int set_arg(char **dst, const char *arg, const char *key)
{
	size_t n = strlen(key);
	if (strncmp(arg, key, n) != 0 || arg[n] != '=')
		return 0;
	free(*dst);
	*dst = strdup(arg + n + 1);
	return 1;
}

int slurm_spank_init(spank_t sp, int ac, char **av)
{
	int i;
	for (i = 0; i < ac; i++) {
		if (set_arg(&site_store, av[i], "store") || set_arg(&hpcckpt_path, av[i], "hpcckpt") ||
		    set_arg(&exec_path, av[i], "exec") || set_arg(&extra_args, av[i], "args"))
			continue;
		slurm_error("hpcckpt: unknown plugstack.conf argument '%s' (known: store= hpcckpt= exec= args=)",
			    av[i]);
		return -1;
	}
	if (spank_option_register(sp, &checkpoint_option) != ESPANK_SUCCESS) {
		slurm_error("hpcckpt: cannot register --%s", OPT_NAME);
		return -1;
	}
	return 0;
}

/* The batch step only: that is the job script every requeued run starts again. */
static int is_batch_step(spank_t sp)
{
	uint32_t step = 0;
	if (spank_get_item(sp, S_JOB_STEPID, &step) != ESPANK_SUCCESS)
		return 0;
	return step == SLURM_BATCH_SCRIPT;
}

int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
	int argc = 0;
	char **argv = NULL;
	char *value = NULL;
	(void) ac;
	(void) av;

	if (!spank_remote(sp) || !is_batch_step(sp))
		return 0;
	if (!schedule && spank_option_getopt(sp, &checkpoint_option, &value) == ESPANK_SUCCESS && value)
		schedule = strdup(value);
	if (!schedule)
		return 0;
	/* From here on a problem is reported in the job's output and the job runs unchanged:
	 * a missing checkpoint must not cost the user the run itself. */
	if (!site_store || !hpcckpt_path || !exec_path) {
		fprintf(stderr, "hpcckpt: --checkpoint ignored: plugstack.conf lacks store=, hpcckpt= or exec= "
			"(ask the site admins); the job runs without checkpoints\n");
		return 0;
	}
	if (access(exec_path, X_OK) != 0 || access(hpcckpt_path, X_OK) != 0) {
		fprintf(stderr, "hpcckpt: --checkpoint ignored: %s or %s is not executable here (%s); "
			"the job runs without checkpoints\n", exec_path, hpcckpt_path, strerror(errno));
		return 0;
	}
	if (spank_get_item(sp, S_JOB_ARGV, &argc, &argv) != ESPANK_SUCCESS || argc < 1 || !argv || !argv[0]) {
		fprintf(stderr, "hpcckpt: --checkpoint ignored: the batch script's argv is not available; "
			"the job runs without checkpoints\n");
		return 0;
	}
	if (spank_setenv(sp, "HPCCKPT_SPANK_SCRIPT", argv[0], 1) != ESPANK_SUCCESS ||
	    spank_setenv(sp, "HPCCKPT_SPANK_STORE", site_store, 1) != ESPANK_SUCCESS ||
	    spank_setenv(sp, "HPCCKPT_SPANK_SCHEDULE", schedule, 1) != ESPANK_SUCCESS ||
	    spank_setenv(sp, "HPCCKPT_SPANK_HPCCKPT", hpcckpt_path, 1) != ESPANK_SUCCESS ||
	    spank_setenv(sp, "HPCCKPT_SPANK_ARGS", extra_args ? extra_args : "", 1) != ESPANK_SUCCESS) {
		fprintf(stderr, "hpcckpt: --checkpoint ignored: cannot set the job environment; "
			"the job runs without checkpoints\n");
		return 0;
	}
	/* slurmstepd execs task->argv[0] with task->argv right after this hook */
	argv[0] = strdup(exec_path);
	return 0;
}

int slurm_spank_exit(spank_t sp, int ac, char **av)
{
	(void) sp;
	(void) ac;
	(void) av;
	free(schedule);
	schedule = NULL;
	return 0;
}
