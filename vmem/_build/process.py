"""Process plumbing: prctl(PR_SET_PDEATHSIG) so that children never outlive their parent."""

INCLUDES = """
#include <sys/prctl.h>
#include <signal.h>
"""

TYPES = ""

FUNCTIONS = """
int vmem_set_pdeathsig(int sig);
"""

CUSTOMIZATIONS = """
static int vmem_set_pdeathsig(int sig)
{
    return prctl(PR_SET_PDEATHSIG, (unsigned long)sig, 0UL, 0UL, 0UL) == 0 ? 0 : -errno;
}
"""
