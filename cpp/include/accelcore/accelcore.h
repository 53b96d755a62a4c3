// Umbrella header.
#pragma once

#include <accelcore/config.h>
#include <accelcore/engine.h>
#include <accelcore/errors.h>
#include <accelcore/sampling.h>
