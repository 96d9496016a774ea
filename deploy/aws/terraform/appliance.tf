# --- identity of the instances --------------------------------------------------------------------

resource "aws_iam_role" "appliance" {
  name_prefix        = "${var.name}-appliance-"
  assume_role_policy = data.aws_iam_policy_document.appliance_assume.json
  tags               = local.tags
}

data "aws_iam_policy_document" "appliance_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

# Session Manager instead of SSH: no key pair, no port 22.
resource "aws_iam_role_policy_attachment" "ssm" {
  role       = aws_iam_role.appliance.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

# Read the binary and the rule set; nothing else.
resource "aws_iam_role_policy" "artifacts" {
  name   = "read-egressd-artifacts"
  role   = aws_iam_role.appliance.id
  policy = data.aws_iam_policy_document.artifacts.json
}

data "aws_iam_policy_document" "artifacts" {
  statement {
    sid       = "Binary"
    actions   = ["s3:GetObject"]
    resources = ["arn:${data.aws_partition.current.partition}:s3:::${var.egressd_artifact_bucket}/${var.egressd_artifact_key}"]
  }

  statement {
    sid       = "RuleFiles"
    actions   = ["s3:GetObject"]
    resources = ["arn:${data.aws_partition.current.partition}:s3:::${var.rules_bucket}/${var.rules_prefix}*"]
  }

  statement {
    sid       = "ListRuleFiles"
    actions   = ["s3:ListBucket"]
    resources = ["arn:${data.aws_partition.current.partition}:s3:::${var.rules_bucket}"]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = [var.rules_prefix, "${var.rules_prefix}*"]
    }
  }
}

resource "aws_iam_instance_profile" "appliance" {
  name_prefix = "${var.name}-appliance-"
  role        = aws_iam_role.appliance.name
  tags        = local.tags
}

# --- security groups ------------------------------------------------------------------------------

# The load balancer: clients only, to the proxy and DNS ports.
resource "aws_security_group" "nlb" {
  name_prefix = "${var.name}-nlb-"
  description = "egressd load balancer: proxy and DNS from the client subnets"
  vpc_id      = aws_vpc.egress.id
  tags        = merge(local.tags, { Name = "${var.name}-nlb" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "nlb" {
  for_each = {
    for pair in setproduct(local.client_cidrs, [["tcp", 3128], ["tcp", 53], ["udp", 53]]) :
    "${pair[0]}-${pair[1][0]}-${pair[1][1]}" => { cidr = pair[0], proto = pair[1][0], port = pair[1][1] }
  }
  security_group_id = aws_security_group.nlb.id
  description       = "egressd ${each.value.proto}/${each.value.port} from client range ${each.value.cidr}"
  cidr_ipv4         = each.value.cidr
  ip_protocol       = each.value.proto
  from_port         = each.value.port
  to_port           = each.value.port
}

resource "aws_vpc_security_group_egress_rule" "nlb" {
  for_each = {
    for pair in setproduct(values(local.appliance_cidrs), [["tcp", 3128], ["tcp", 53], ["udp", 53], ["tcp", 9180]]) :
    "${pair[0]}-${pair[1][0]}-${pair[1][1]}" => { cidr = pair[0], proto = pair[1][0], port = pair[1][1] }
  }
  security_group_id = aws_security_group.nlb.id
  description       = "to egressd ${each.value.proto}/${each.value.port} (traffic and health checks) in ${each.value.cidr}"
  cidr_ipv4         = each.value.cidr
  ip_protocol       = each.value.proto
  from_port         = each.value.port
  to_port           = each.value.port
}

# The instances. The load balancer preserves client addresses, so the proxy and DNS ports admit
# the client ranges themselves; the admin port admits the load balancer's nodes (health checks,
# from the appliance subnets) and the Prometheus scrapers.
resource "aws_security_group" "appliance" {
  name_prefix = "${var.name}-appliance-"
  description = "egressd instances: clients via the load balancer, health checks, Prometheus"
  vpc_id      = aws_vpc.egress.id
  tags        = merge(local.tags, { Name = "${var.name}-appliance" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "appliance_clients" {
  for_each = {
    for pair in setproduct(local.client_cidrs, [["tcp", 3128], ["tcp", 53], ["udp", 53]]) :
    "${pair[0]}-${pair[1][0]}-${pair[1][1]}" => { cidr = pair[0], proto = pair[1][0], port = pair[1][1] }
  }
  security_group_id = aws_security_group.appliance.id
  description       = "egressd ${each.value.proto}/${each.value.port} from client range ${each.value.cidr}"
  cidr_ipv4         = each.value.cidr
  ip_protocol       = each.value.proto
  from_port         = each.value.port
  to_port           = each.value.port
}

resource "aws_vpc_security_group_ingress_rule" "appliance_admin" {
  for_each          = toset(concat(values(local.appliance_cidrs), var.scraper_cidrs))
  security_group_id = aws_security_group.appliance.id
  description       = "egressd admin port (/readyz health checks, /metrics) from ${each.value}"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 9180
  to_port           = 9180
}

# Upstreams on the ports the rules allow, and 443 for the AWS APIs the instance itself uses (S3
# for the binary and the rules, Session Manager).
resource "aws_vpc_security_group_egress_rule" "appliance_upstreams" {
  for_each          = toset([for p in distinct(concat(var.allowed_egress_ports, [443])) : tostring(p)])
  security_group_id = aws_security_group.appliance.id
  description       = "egressd to upstreams on tcp/${each.value} (the policy decides which names)"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "tcp"
  from_port         = tonumber(each.value)
  to_port           = tonumber(each.value)
}

resource "aws_vpc_security_group_egress_rule" "appliance_dns" {
  for_each          = toset(["tcp", "udp"])
  security_group_id = aws_security_group.appliance.id
  description       = "egressd's upstream resolver, ${each.value}/53"
  cidr_ipv4         = "${split(":", local.dns_upstream)[0]}/32"
  ip_protocol       = each.value
  from_port         = 53
  to_port           = 53
}

# --- launch template and Auto Scaling group -------------------------------------------------------

data "aws_ssm_parameter" "al2023" {
  name = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-${var.architecture}"
}

locals {
  egressd_toml = templatefile("${path.module}/templates/egressd.toml.tftpl", {
    max_connections = var.max_connections
    dns_upstream    = local.dns_upstream
    admin_clients   = concat(["127.0.0.0/8", "::1/128"], values(local.appliance_cidrs), var.scraper_cidrs)
    guard_allow     = var.guard_allow_cidrs
    pac_proxy       = "${aws_lb.egressd.dns_name}:3128"
  })

  user_data = templatefile("${path.module}/templates/user-data.sh.tftpl", {
    region          = data.aws_region.current.name
    artifact_url    = "s3://${var.egressd_artifact_bucket}/${var.egressd_artifact_key}"
    egressd_sha256  = var.egressd_sha256
    rules_source    = "s3://${var.rules_bucket}/${var.rules_prefix}"
    egressd_toml    = local.egressd_toml
    egressd_service = file("${path.module}/../../systemd/egressd.service")
    sync_service    = file("${path.module}/../../systemd/egressd-rules-sync.service")
    sync_timer      = file("${path.module}/../../systemd/egressd-rules-sync.timer")
    sync_script     = file("${path.module}/../../systemd/egressd-rules-sync")
  })
}

resource "aws_launch_template" "egressd" {
  name_prefix            = "${var.name}-"
  description            = "egressd appliance"
  image_id               = data.aws_ssm_parameter.al2023.value
  instance_type          = var.instance_type
  update_default_version = true
  user_data              = base64gzip(local.user_data)
  ebs_optimized          = true

  iam_instance_profile {
    arn = aws_iam_instance_profile.appliance.arn
  }

  # IMDSv2 only, one hop: a process reached through the proxy cannot replay a token request, and
  # containers on the host (if any) cannot reach the metadata service.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
  }

  network_interfaces {
    associate_public_ip_address = false
    delete_on_termination       = true
    security_groups             = [aws_security_group.appliance.id]
  }

  block_device_mappings {
    device_name = "/dev/xvda"

    ebs {
      volume_size           = var.root_volume_gib
      volume_type           = "gp3"
      encrypted             = true
      delete_on_termination = true
    }
  }

  monitoring {
    enabled = true
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(local.tags, { Name = var.name })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(local.tags, { Name = var.name })
  }

  tags = local.tags
}

resource "aws_autoscaling_group" "egressd" {
  name_prefix               = "${var.name}-"
  vpc_zone_identifier       = [for s in aws_subnet.appliance : s.id]
  min_size                  = var.min_size
  max_size                  = var.max_size
  desired_capacity          = var.desired_capacity
  health_check_type         = "ELB"
  health_check_grace_period = 180
  default_instance_warmup   = 120
  target_group_arns         = [aws_lb_target_group.proxy.arn, aws_lb_target_group.dns.arn]
  termination_policies      = ["OldestLaunchTemplate", "OldestInstance"]
  capacity_rebalance        = false
  wait_for_capacity_timeout = "15m"

  launch_template {
    id      = aws_launch_template.egressd.id
    version = aws_launch_template.egressd.latest_version
  }

  # A new launch template version (binary, config, AMI) replaces instances one at a time, each
  # healthy on /readyz before the next goes.
  instance_refresh {
    strategy = "Rolling"

    preferences {
      min_healthy_percentage = 100
      max_healthy_percentage = 200
      instance_warmup        = 120
    }
  }

  dynamic "tag" {
    for_each = merge(local.tags, { Name = var.name })
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_autoscaling_policy" "cpu" {
  name                   = "${var.name}-cpu"
  autoscaling_group_name = aws_autoscaling_group.egressd.name
  policy_type            = "TargetTrackingScaling"

  target_tracking_configuration {
    target_value = var.cpu_target_percent

    predefined_metric_specification {
      predefined_metric_type = "ASGAverageCPUUtilization"
    }
  }
}
